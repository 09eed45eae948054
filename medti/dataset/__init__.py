"""Reading a folder of images as the training set: which files are images, DICOM or volumes and how each is read
(sources.py), the crop/resize presets (preprocess.py), and the tensors, names, patients and fingerprint of the
whole set (folder.py). Training, evaluation and the audit all read folders through it.
"""
