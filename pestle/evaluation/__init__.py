"""Evaluate potentials against reference labels: softening scale, errors, parity plots."""
