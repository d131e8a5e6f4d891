"""Engines that run a federation over a method's two halves: :mod:`.engine` (what they share),
:mod:`.simulation` (in process, the default) and :mod:`.flower` (Flower's deployment and
simulation engines)."""
