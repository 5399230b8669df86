"""The embedded default: class-conditional moving-digit clips, a small Wan DiT teacher, and its evaluation.

    data.py        the clips (scikit-learn's bundled digits, moving across a canvas)
    model.py       ClassConditionedDiT, teacher/student load/save and sampling
    presets.py     every default of the demo, written once
    task.py        `rcm distill` (digits): the engine's task and config
    teacher.py     `rcm train-teacher`: how the shipped teacher was trained
    classifier.py  `rcm train-classifier`: the clip-pooled classifier (the old scores, for comparison)
    metrics.py     the per-frame metrics and their frame classifier (what `rcm eval` reports)
    corruptions.py speckle, digit switch, blur, frozen motion: what each metric must notice
    evaluate.py    scoring generators, the distill report, `rcm eval`
    study.py       `rcm study`: rCM / DMD2 / sCM at equal budgets, scored against iterations
    sample.py      `rcm sample` (digits)
"""
