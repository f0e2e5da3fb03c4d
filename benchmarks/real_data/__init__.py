r"""Compressed data-parallel SGD on real data: held-out accuracy against bits sent.

The 8x8 handwritten digits that scikit-learn ships (``sklearn.datasets.load_digits``,
1,797 images, ten classes; nothing is downloaded), split 80/20 stratified with a fixed
seed and standardized (:mod:`.data`), train a softmax MLP 64-32-10 (``jrelu.mlp``) with
data-parallel SGD on 8 simulated devices, global batch 128, through
``jrelu.experiment.make_step``. Every row of :data:`.settings.METHODS` runs from several
seeds in one compiled program (:mod:`.training`):

* float32 SGD, the baseline, in the same run;
* every compressor at one to three compression levels (QSGD s = 1, 4, 16; top-k 1%, 10%
  with error feedback; rand-k 25%, 50%; PowerSGD rank 1, 4; ATOMO budget 16, 64; scaled
  sign with error feedback; TernGrad; FO-SGD), each with a fixed step size tuned for it;
* EASGD and EAMSGD at tau = 1, 4, 16 (float32 exchanges with the center);
* every row under each step-size rule of :data:`.settings.STEP_SIZES` that applies.

For each row: held-out test accuracy and training loss (cross-entropy on the whole
training set) after the last step, as mean, standard deviation, minimum and maximum over
the seeds, against the bits one device sent in the whole run, read from the compiled
step's HLO (``jrelu.wire``). Writes ``OUTDIR/summary.md`` (the README table),
``OUTDIR/real_data.png`` (:mod:`.report`) and ``OUTDIR/results.json`` (everything,
including each row's history of scores), and prints the result as one JSON line.

    python -m benchmarks.real_data --quick     # 3 rows, 1 seed, 20 steps
    python -m benchmarks.real_data             # every row, 3 seeds, 400 steps

References:
  Alistarh et al., "QSGD", arXiv 1610.02132 (Section 5: the same comparison on image
  data sets at several compression levels); Vogels, Karimireddy, Jaggi, "PowerSGD",
  arXiv 1905.13727; Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD",
  arXiv 1412.6651.
"""
