"""spoolcore: small pieces both programs need (spoolagent and receiver). Standard library only;
imports neither ``spoolagent`` nor ``receiver``."""
