"""Training VGG with the paper's recipe (section 3.1), and a synthetic data set to train it on.

``python -m train`` trains (one device, or many with torchrun), ``python -m train.synthetic``
draws the synthetic multi-scale data set, ``python -m train.evaluate`` measures checkpoints with
the serving protocol, and ``python -m train.demo`` makes the demo models (``make demo-models``).
Each command is a thin parser over functions: ``train.config.TrainConfig`` holds a run's
settings and ``train.recipe.train(config)`` runs it; ``train.demo.run_demo`` trains and exports
the demo models with ``train`` and ``export.exporter.export_model``.
Imports ``vgg``, ``inference`` and ``export`` only.
"""
