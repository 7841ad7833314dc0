"""fedlinreg: federated linear regression on synthetic data (numpy only)."""
