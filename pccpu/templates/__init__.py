"""Chat templates: turn PML role tags into the exact text a model's own chat template produces.

See :mod:`pccpu.templates.chat_roles` for how a template is split and what each tag renders to.
"""

from pccpu.templates.chat_roles import ChatRoles, Fallback

__all__ = ["ChatRoles", "Fallback"]
