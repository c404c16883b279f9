"""Tensor-parallel ranks of one model replica: the group they form (gloo on the CPU, NCCL on CUDA),
the processes rank 0 starts and watches, and the per-step broadcast of the scheduler's decisions."""
