"""Is a synthetic set any good, and is it safe to share: image sets, features, metrics, reports and the privacy
audit behind `python -m medti.evaluate` and `python -m medti.audit`."""
