"""The graph pass: from the backend entry to detected, rewritten and validated MoE blocks."""
