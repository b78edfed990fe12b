"""Programs that train, fine-tune and evaluate Itera-Lite (run with `python -m training.<program>`)."""
