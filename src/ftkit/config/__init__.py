"""Configuration layer: the recipe (keys, types, checks), the precision and quantisation rules, launch plans.

Imports nothing heavy (no torch): `ftkit validate`, `keys` and `estimate` live on it."""
