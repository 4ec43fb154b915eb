"""Example PML schemas and prompts (shipped with pccpu; `pccpu demo` uses demo.xml)."""
