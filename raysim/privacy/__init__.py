"""Differential privacy: accounting (Opacus), central DP-FedAvg, local DP-SGD, and a run's plan."""
