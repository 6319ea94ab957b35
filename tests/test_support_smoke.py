from tests.support.images import Pusher, push_image
from tests.support.registry import Registry


def test_generated_images_are_served(src: Registry, src_pusher: Pusher) -> None:
    single = push_image(src_pusher, "lib/one", archs=("amd64",), oci=False)
    multi = push_image(src_pusher, "lib/multi", archs=("amd64", "arm64"))
    assert src.manifest_digest("lib/one", "v1") == single.digest
    assert src.manifest_digest("lib/multi", "v1") == multi.digest
    assert all(src.has_blob("lib/multi", b) for b in multi.blobs)
