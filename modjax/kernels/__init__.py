"""Fast paths per backend (grouped matmul), each with a reference twin."""
