"""Everything around a run: data sets, configs, sweeps, results and plots."""
