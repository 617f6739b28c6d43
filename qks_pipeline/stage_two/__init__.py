"""Stage two, from the cache only: the QKS head, and everything that trains and evaluates it.

The head (queries, Q-Former, projection), its losses, the loader, training (on one or several
processes), scoring, metrics, evaluation, checkpoints and the authors' checkpoint import.
"""
