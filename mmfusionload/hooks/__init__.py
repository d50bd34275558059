from .fusion_load_hook import FusionLoadHook, is_fusion_load_hook

__all__ = ['FusionLoadHook', 'is_fusion_load_hook']
