"""Training data: scan and validate a folder, captions, aspect buckets, the dataset and its caches."""

from .buckets import Bucket, assign_bucket, bucket_list
from .captions import CaptionRules, make_caption
from .scan import Item, ScanReport, scan_folder

__all__ = ["Bucket", "CaptionRules", "Item", "ScanReport", "assign_bucket", "bucket_list", "make_caption", "scan_folder"]
