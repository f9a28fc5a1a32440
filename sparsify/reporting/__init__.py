"""Reporting: the run report and the paper's claims against this run."""
