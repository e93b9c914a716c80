"""cloud-agent: HTTP /answer; fetches KV (or scout positions) from an edge-agent, injects them and generates."""
