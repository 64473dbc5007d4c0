"""Time series as tokens (issue 8): data loading and checks, the series model (pretraining on
synthetic series, sampled forecasts, generation, fine-tuning) and rolling-origin backtests."""
