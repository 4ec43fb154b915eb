"""``GET /metrics``: Prometheus text (requests, errors, TTFT, prompt tokens by where their KV came from, store and
session bytes, queue depth)."""

from __future__ import annotations

from dataclasses import dataclass

from pccpu.service import CacheStats, Result


@dataclass
class Metrics:
    requests: int = 0
    errors: int = 0
    answered: int = 0
    ttft_seconds: float = 0.0
    session_tokens: int = 0
    stored_tokens: int = 0
    decoded_tokens: int = 0
    completion_tokens: int = 0

    def record(self, result: Result) -> None:
        self.answered += 1
        self.ttft_seconds += result.ttft_ms / 1000
        self.session_tokens += result.session_tokens
        self.stored_tokens += result.cached_tokens
        self.decoded_tokens += result.uncached_tokens
        self.completion_tokens += result.generated_tokens

    def render(self, stats: CacheStats, queued: int) -> str:
        lines = [
            "# TYPE pccpu_requests_total counter", f"pccpu_requests_total {self.requests}",
            "# TYPE pccpu_request_errors_total counter", f"pccpu_request_errors_total {self.errors}",
            "# TYPE pccpu_ttft_seconds summary", f"pccpu_ttft_seconds_sum {self.ttft_seconds:.6f}",
            f"pccpu_ttft_seconds_count {self.answered}",
            "# TYPE pccpu_prompt_tokens_total counter",
            f'pccpu_prompt_tokens_total{{source="session"}} {self.session_tokens}',
            f'pccpu_prompt_tokens_total{{source="stored"}} {self.stored_tokens}',
            f'pccpu_prompt_tokens_total{{source="decoded"}} {self.decoded_tokens}',
            "# TYPE pccpu_completion_tokens_total counter", f"pccpu_completion_tokens_total {self.completion_tokens}",
            "# TYPE pccpu_store_bytes gauge", f'pccpu_store_bytes{{tier="ram"}} {stats.store.ram_bytes}',
            f'pccpu_store_bytes{{tier="disk"}} {stats.store.disk_bytes}',
            "# TYPE pccpu_session_bytes gauge", f"pccpu_session_bytes {stats.sessions.parked_bytes}",
            "# TYPE pccpu_queue_depth gauge", f"pccpu_queue_depth {queued}",
        ]
        store = stats.store
        if store.remote_url is not None:  # a remote tier shared by a fleet (docs/remote-store.md)
            lines += [
                "# TYPE pccpu_remote_up gauge", f"pccpu_remote_up {int(store.remote_available)}",
                "# TYPE pccpu_remote_lookups_total counter",
                f'pccpu_remote_lookups_total{{result="hit"}} {store.remote_hits}',
                f'pccpu_remote_lookups_total{{result="miss"}} {store.remote_misses}',
                f'pccpu_remote_lookups_total{{result="corrupt"}} {store.remote_corrupt}',
                "# TYPE pccpu_remote_bytes_total counter",
                f'pccpu_remote_bytes_total{{direction="read"}} {store.remote_bytes_read}',
                f'pccpu_remote_bytes_total{{direction="written"}} {store.remote_bytes_written}',
                "# TYPE pccpu_remote_errors_total counter", f"pccpu_remote_errors_total {store.remote_errors}",
                "# TYPE pccpu_fleet_waits_total counter", f"pccpu_fleet_waits_total {store.fleet_waits}",
            ]
        return "\n".join(lines) + "\n"
