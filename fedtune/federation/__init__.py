"""Engines that run a federation: in-process simulation (Flower adapter to come)."""
