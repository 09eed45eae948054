"""Does synthetic data help a classifier? The downstream-utility harness behind `python -m medti.utility`: labels and
patient-grouped splits, a linear probe on frozen features, and the statistics papers report (AUC, DeLong's test,
bootstrap intervals over patients)."""
