"""Interoperability with torch.distributed.checkpoint (DCP): its calls, its storage protocol, its format."""
