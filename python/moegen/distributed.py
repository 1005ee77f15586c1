"""moegen.distributed — expert parallelism over torch.distributed.

    import torch.distributed as dist
    dist.init_process_group("gloo")                    # CPU ranks (torchrun); any process group
    comm = moegen.distributed.Communicator()           # this group's rank and size
    moe = MoE("layer.yaml", comm=comm)                 # the spec's ep_size = the group's size

The runtime's caller-provided transport (moegen_comm_create): the four collectives an
expert-parallel layer needs, on host buffers, each waiting at most the communicator's deadline
(default $MOEGEN_COMM_TIMEOUT, else 300 s). A collective that fails or times out fails the forward
on this rank with moegen.Error (MOEGEN_ERR_COMM), and the communicator is broken from then on.
"""
from datetime import timedelta

import torch
import torch.distributed as dist

from . import _C


def _bytes(view):
    """A uint8 tensor over a writable memoryview (no copy)."""
    if len(view) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


class TorchTransport:
    """The collectives over a torch.distributed process group (gloo for CPU tensors)."""

    def __init__(self, group=None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _wait(self, work, timeout):
        if not work.wait(timeout=timedelta(seconds=timeout)):
            raise TimeoutError(f"a peer did not answer within {timeout:g} s")

    def alltoall(self, args):
        send, recv, nbytes, timeout = args
        self._wait(dist.all_to_all_single(_bytes(recv), _bytes(send), group=self.group, async_op=True), timeout)

    def alltoallv(self, args):
        send, send_counts, send_offsets, recv, recv_counts, recv_offsets, unit, timeout = args
        s, r = _bytes(send), _bytes(recv)
        packed = torch.cat([s[o * unit:(o + c) * unit] for c, o in zip(send_counts, send_offsets)]) \
            if sum(send_counts) else torch.empty(0, dtype=torch.uint8)
        out = torch.empty(sum(recv_counts) * unit, dtype=torch.uint8)
        work = dist.all_to_all_single(out, packed, output_split_sizes=[c * unit for c in recv_counts],
                                      input_split_sizes=[c * unit for c in send_counts], group=self.group,
                                      async_op=True)
        self._wait(work, timeout)
        at = 0
        for c, o in zip(recv_counts, recv_offsets):
            r[o * unit:(o + c) * unit] = out[at:at + c * unit]
            at += c * unit

    def allreduce_max(self, args):
        values, timeout = args
        t = _bytes(values).view(torch.int64)
        self._wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), timeout)

    def allgather(self, args):
        send, recv, nbytes, timeout = args
        r = _bytes(recv)
        chunks = [r[q * nbytes:(q + 1) * nbytes] for q in range(self.size)]
        self._wait(dist.all_gather(chunks, _bytes(send).clone(), group=self.group, async_op=True), timeout)


class Communicator:
    """A moegen communicator over a torch.distributed group (default: the world)."""

    def __init__(self, group=None, timeout=0.0):
        if not dist.is_initialized():
            raise RuntimeError("moegen.distributed.Communicator: call torch.distributed.init_process_group first")
        self.transport = TorchTransport(group)
        self.rank, self.size = self.transport.rank, self.transport.size
        self._capsule = _C.comm_create(self.rank, self.size, self.transport, float(timeout))
