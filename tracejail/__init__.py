"""tracejail: trace what a program touches, ship it as a tiny FROM-scratch image."""

__version__ = "0.1.0"
