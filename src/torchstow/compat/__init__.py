"""DCP's conventions, accepted below the API: ``dcp_calls`` turns DCP's keywords
(``checkpoint_id``, storage objects, DCP planners, Stateful values) into what the
protocol takes; ``dcp_planners`` adapts DCP's planners to torchstow's protocol and
``dcp_types`` translates plans and items between the two libraries.

``api`` uses these; ``interop`` (DCP storage objects over torchstow, conversion) builds
on them. The modules that subclass or build DCP's classes import
``torch.distributed.checkpoint`` (a heavy import), so they are loaded on first use.
"""
