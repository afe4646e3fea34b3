"""Model loading: encoders (open_clip, timm), prompt learners, PEFT, classifier backbones."""
