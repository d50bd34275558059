from .fusion_load_hook import FusionLoadHook

__all__ = ['FusionLoadHook']
