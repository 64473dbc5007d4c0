"""Synthetic tabular records and the fidelity / utility / privacy reports that vet them."""
