from .ddf_up_fpn import DDFUpFPN

__all__ = ['DDFUpFPN']
