"""The embedded default: class-conditional moving-digit clips, a small Wan DiT teacher, and its evaluation.

    data.py        the clips (scikit-learn's bundled digits, moving across a canvas)
    model.py       ClassConditionedDiT, teacher/student load/save and sampling
    presets.py     every default of the demo, written once
    task.py        `rcm distill` (digits): the engine's task and config
    teacher.py     `rcm train-teacher`: how the shipped teacher was trained
    classifier.py  `rcm train-classifier`: the clip classifier that scores samples
    evaluate.py    quality/diversity metrics, the distill report, `rcm eval`
    sample.py      `rcm sample` (digits)
"""
