"""Names of the parts of a training step that ``benchmarks/step_profile.py`` reports.

Methods and networks wrap these parts in ``torch.profiler.record_function(NAME)``; outside a
profiler that costs about a microsecond per call.
"""

DDIM = "ddim_sample"          # DDIM sampling (Diff-CL pseudo-labels, ProtoDiff teacher)
HFM = "hfm"                   # high-frequency Mamba blocks (forward)
CONTRAST = "contrast"         # Diff-CL memory-bank contrastive terms, ProtoDiff prototype terms
TEACHER = "teacher"           # EMA-teacher / peer passes without gradient (MT, UA-MT, BCP, ProtoDiff)
EMA = "ema_update"            # EMA weight updates
PARTS = (DDIM, HFM, CONTRAST, TEACHER, EMA)
