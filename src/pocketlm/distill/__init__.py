"""Distillation: prune a teacher into a student (and, later, heal it with knowledge distillation)."""
