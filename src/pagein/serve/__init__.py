"""The fault server: Firecracker's handler protocol, per-VM event loops, restore strategies.

- :mod:`pagein.serve.firecracker`: the wire format, both the VMM and the handler side.
- :mod:`pagein.serve.server`: the listener serving any number of VMs at once.
- :mod:`pagein.serve.session`: one VM's uffd event loop.
- :mod:`pagein.serve.strategies`: on-demand, readahead, populate-all, working-set.
- :mod:`pagein.serve.local`: restore a snapshot into this process's own memory.
"""
