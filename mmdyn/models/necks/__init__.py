# Copyright (c) mmdyn contributors. All rights reserved.
from .ddf_up_fpn import DDFUpFPN
from .ddf_up_nas_fpn import DDFUpNASFPN
from .ddf_up_pafpn import DDFUpPAFPN

__all__ = ['DDFUpFPN', 'DDFUpNASFPN', 'DDFUpPAFPN']
