"""The data spine: Minari -> validated, cached Arrow (convert), batch samplers, the one DataModule, recording."""
