"""Where routed experts run: the ExpertBackend contract with its torch reference (backend) and the CPU
kernels fed from the weight pack (cpu)."""
