"""Training of the localization network (needs the ``train`` extra: torch).

``network`` defines the model, ``train`` fits it on simulated scenes with the
bivariate Gaussian negative log-likelihood, ``export`` writes the ONNX file and
its model card and checks onnxruntime against torch.
"""
