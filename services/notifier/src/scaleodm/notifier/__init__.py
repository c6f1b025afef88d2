"""The notifier: delivers NodeODM webhooks when tasks end."""
