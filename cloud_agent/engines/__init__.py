"""The cloud's answer engines (inject received KV, generate, stream tokens): one file each, one registry."""
