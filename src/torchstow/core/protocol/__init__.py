"""The collective save and load protocol: its steps, the collective, failure capture, private gloo groups."""
