"""edge-agent: prefills contexts with the edge model and streams the codec's frames over gRPC."""
