"""The kvmesh gateway: prefix-aware routing of kvmesh.v1.Inference traffic."""
