"""A small KVM virtual machine monitor: guest memory, vCPUs entered at CPL 3, a port-I/O
guest ABI, and the guest workloads that run on it (see docs/vmm.md)."""
