"""The on-disk contract of a torchstow checkpoint, and nothing else.

Manifest dataclasses and their versioned codec, file naming, checksums, the
structure records of nested state dicts, non-tensor leaf encodings and chunk
geometry. A format change touches this package and docs/format.md only.
"""
