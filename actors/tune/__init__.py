"""`hitl tune`: a hyper-parameter search over any run-config field, on Ray Tune.

    hitl tune search.yaml --out runs/tune        # a new search
    hitl tune --resume runs/tune                 # after a crash: finished trials are kept

[1] The space file (`config.TuneSpec`) names the run config the trials start from, the fields
    to search and how (grid, random, Bayesian: Optuna's TPE), the objective, the trial kind and
    the scheduler (ASHA stops weak trials at its rungs, measured in rounds).
[2] A trial (`trials.py`) is the loop's reward-model stage replayed over a frozen snapshot of
    stored feedback (`replay`: the records up to the watermark the search started at, in
    watermark order, so no person is asked again) or the whole loop with simulated annotators
    (`loop`). Each round reports the objective to Tune.
[3] Tune's own experiment state lives in OUT/search and is saved after every step, so a killed
    search resumes with its finished trials kept (unfinished ones start again). The results
    (`results.py`): results.csv and results.md, search.png, best.yaml (the whole best config).
"""
