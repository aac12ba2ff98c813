"""The s3, printify and shopify adapters against local stand-ins (moto's S3 server, a
fake Printify, a fake Shopify): items and their files arrive, publishing again or after
a lost answer makes nothing new, failures are retried or not as they should be, and no
secret ends up in an error or a log."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from jobs import services as job_services
from jobs.models import Job, JobLog, JobStatus
from omniva.errors import OmnivaError
from omniva.media import artifact_save, media_reference
from omniva.models import Clip, Project
from publishing import adapters, services
from publishing.models import Destination, Publication, PublicationStatus
from tests.conftest import free_port
from tests.publishing.fake_platforms import (
    PRINTIFY_TOKEN,
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    SHOPIFY_TOKEN,
    FakePlatform,
    FakePrintify,
    FakeShopify,
    S3Bucket,
    moto_call,
    moto_endpoint,
    printify,
    s3_bucket,
    shopify,
)

pytestmark = pytest.mark.django_db

__all__ = ["moto_endpoint", "printify", "s3_bucket", "shopify"]

CLIP_BYTES = b"\x00\x00\x00\x18ftypmp42 not really a video"
SECRETS = (PRINTIFY_TOKEN, SHOPIFY_TOKEN, S3_SECRET_KEY, S3_ACCESS_KEY)
DESIGN_PAYLOAD = {
    "title": "Sunset tee",
    "description": "A <b>retro</b> sunset.\nPrinted on the front.",
    "product_type": "tshirt",
    "tags": ["sunset", "retro"],
    "price": "24.99",
}


def design_png(color: tuple[int, int, int] = (230, 90, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(autouse=True)
def storage_and_fakes(settings: Any, tmp_path: Path) -> None:
    """Local media storage in a folder of the test's own; the fakes on 127.0.0.1 allowed."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.OMNIVA_PUBLISH_ROOT = tmp_path / "publish"
    settings.OMNIVA_ALLOW_PRIVATE_URLS = True


@pytest.fixture
def project() -> Project:
    return Project.objects.create(name="studio")


@pytest.fixture
def clip(project: Project) -> Clip:
    name = artifact_save("clips/sunset/clip.mp4", CLIP_BYTES)
    return Clip.objects.create(
        project=project,
        title="Sunset timelapse",
        transcript="the sun goes down",
        media_url=media_reference(name),
    )


@pytest.fixture
def design() -> str:
    return artifact_save("jobs/design-job/design.png", design_png())


def s3_destination(project: Project, store: S3Bucket, **config: Any) -> Destination:
    return Destination.objects.create(
        project=project,
        name="bucket",
        kind="s3",
        config={
            "bucket": store.name,
            "prefix": "exports/",
            "region": "us-east-1",
            "endpoint_url": store.endpoint,
            **config,
        },
        secrets={"access_key_id": S3_ACCESS_KEY, "secret_access_key": S3_SECRET_KEY},
    )


def printify_destination(
    project: Project, fake: FakePrintify, *, token: str = PRINTIFY_TOKEN
) -> Destination:
    return Destination.objects.create(
        project=project,
        name="printify",
        kind="printify",
        config={
            "shop_id": fake.shop_id,
            "blueprint_id": 6,
            "print_provider_id": 99,
            "variants": [12100, 12101],
            "api_base": fake.url,
        },
        secrets={"api_token": token},
    )


def shopify_destination(
    project: Project, fake: FakeShopify, *, token: str = SHOPIFY_TOKEN
) -> Destination:
    return Destination.objects.create(
        project=project,
        name="shopify",
        kind="shopify",
        config={"shop": "omniva-test.myshopify.com", "api_base": fake.url},
        secrets={"access_token": token},
    )


def design_publication(destination: Destination, design: str) -> Publication:
    return services.publication_record(
        destination=destination, artifact=design, payload=DESIGN_PAYLOAD
    )


def publish_job(clip: Clip) -> Job:
    job, _ = job_services.job_submit(pipeline="publish", params={"clip_id": str(clip.pk)})
    return job


def failed_publish(publication: Publication) -> OmnivaError:
    with pytest.raises(OmnivaError) as raised:
        services.publication_publish(publication_id=publication.pk)
    publication.refresh_from_db()
    assert publication.status == PublicationStatus.FAILED
    assert publication.error["code"] == "UPLOAD_FAILED"
    return raised.value


def assert_no_secret_shown(publication: Publication, job: Job | None = None) -> None:
    publication.refresh_from_db()
    shown = [json.dumps(publication.error)]
    if job is not None:
        job.refresh_from_db()
        shown.append(json.dumps(job.error))
        shown.extend(JobLog.objects.filter(job=job).values_list("message", flat=True))
        shown.extend(json.dumps(stage.error) for stage in job.stages.all())
    for secret in SECRETS:
        assert not any(secret in text for text in shown), (secret, shown)


# --- S3 ----------------------------------------------------------------------------------


def test_a_clip_and_a_design_reach_an_s3_bucket_as_file_and_description(
    drain: Callable[..., Any], s3_bucket: S3Bucket, clip: Clip, design: str
) -> None:
    destination = s3_destination(clip.project, s3_bucket)
    job = publish_job(clip)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    clip_key = Publication.objects.get(clip=clip).idempotency_key
    published = services.publication_publish(
        publication_id=design_publication(destination, design).pk
    )
    design_key = published.idempotency_key

    assert s3_bucket.keys() == sorted(
        [
            f"exports/{clip_key}.mp4",
            f"exports/{clip_key}.json",
            f"exports/{design_key}.png",
            f"exports/{design_key}.json",
        ]
    )
    assert s3_bucket.read(f"exports/{clip_key}.mp4") == CLIP_BYTES
    assert json.loads(s3_bucket.read(f"exports/{clip_key}.json"))["title"] == "Sunset timelapse"
    assert s3_bucket.read(f"exports/{design_key}.png") == design_png()
    assert s3_bucket.content_type(f"exports/{design_key}.png") == "image/png"
    assert json.loads(s3_bucket.read(f"exports/{design_key}.json"))["price"] == "24.99"
    assert (published.external_id, published.url) == (
        f"exports/{design_key}.png",
        f"s3://{s3_bucket.name}/exports/{design_key}.png",
    )


def test_sending_to_s3_again_after_a_lost_answer_overwrites_the_same_objects(
    drain: Callable[..., Any], s3_bucket: S3Bucket, clip: Clip
) -> None:
    s3_destination(clip.project, s3_bucket)
    publish_job(clip)
    drain()
    before = s3_bucket.keys()
    publication = Publication.objects.get()
    # The worker died after the upload, before it recorded it: the row says publishing.
    Publication.objects.filter(pk=publication.pk).update(status=PublicationStatus.PUBLISHING)
    again = services.publication_publish(publication_id=publication.pk)
    assert again.status == PublicationStatus.PUBLISHED
    assert again.attempts == 2
    assert s3_bucket.keys() == before  # the same two objects, none added
    assert len(before) == 2
    assert s3_bucket.read(again.external_id) == CLIP_BYTES


def test_an_unreachable_s3_store_fails_the_publication_and_the_job_retries(
    drain: Callable[..., Any], due: Callable[[Job], None], s3_bucket: S3Bucket, clip: Clip
) -> None:
    destination = s3_destination(
        clip.project, s3_bucket, endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    job = publish_job(clip)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.RETRYING, job.error
    publication = Publication.objects.get()
    assert publication.status == PublicationStatus.FAILED
    assert publication.error["code"] == "UPLOAD_FAILED"
    assert "could not be reached" in publication.error["message"]
    assert_no_secret_shown(publication, job)

    destination.config["endpoint_url"] = s3_bucket.endpoint  # the store is back
    destination.save()
    due(job)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    assert len(s3_bucket.keys()) == 2


def test_a_missing_bucket_is_a_lasting_failure_that_shows_no_secret(
    s3_bucket: S3Bucket, project: Project, design: str
) -> None:
    destination = s3_destination(project, s3_bucket, bucket="no-such-bucket-here")
    publication = design_publication(destination, design)
    error = failed_publish(publication)
    assert "NoSuchBucket" in error.message
    with pytest.raises(adapters.AdapterError) as raised:
        adapters.publish(destination, services._item(publication), publication.idempotency_key)
    assert raised.value.transient is False
    assert_no_secret_shown(publication)


def test_s3_credentials_the_store_refuses_are_a_lasting_failure(
    s3_bucket: S3Bucket, project: Project, design: str
) -> None:
    destination = s3_destination(project, s3_bucket)
    publication = design_publication(destination, design)
    moto_call(s3_bucket.endpoint, "/moto-api/reset-auth", b"0")  # check every key from now
    try:
        with pytest.raises(adapters.AdapterError) as raised:
            adapters.publish(destination, services._item(publication), publication.idempotency_key)
        error = failed_publish(publication)
    finally:
        moto_call(s3_bucket.endpoint, "/moto-api/reset-auth", b"inf")
    assert raised.value.transient is False
    assert "InvalidAccessKeyId" in raised.value.message
    assert "InvalidAccessKeyId" in error.message
    assert s3_bucket.keys() == []
    assert_no_secret_shown(publication)


# --- Printify ----------------------------------------------------------------------------


def test_a_design_becomes_one_published_printify_product(
    printify: FakePrintify, project: Project, design: str
) -> None:
    for n in range(3):  # other products, so the tag is searched over pages
        printify.add_product(f"Older product {n}", ["vintage"])
    publication = design_publication(printify_destination(project, printify), design)
    published = services.publication_publish(publication_id=publication.pk)

    key = publication.idempotency_key
    product = printify.products[published.external_id]
    assert product["title"] == "Sunset tee"
    assert product["tags"] == ["sunset", "retro", f"omniva-{key}"]
    assert (product["blueprint_id"], product["print_provider_id"]) == (6, 99)
    assert product["variants"] == [
        {"id": 12100, "price": 2499, "is_enabled": True},
        {"id": 12101, "price": 2499, "is_enabled": True},
    ]
    [area] = product["print_areas"]
    [placeholder] = area["placeholders"]
    [image] = placeholder["images"]
    assert (area["variant_ids"], placeholder["position"]) == ([12100, 12101], "front")
    assert printify.uploads[image["id"]] == design_png()
    assert printify.published == [published.external_id]
    [create] = printify.requests_to("POST", r"/products\.json$")
    assert create.headers["Idempotency-Key"] == key
    assert len(printify.requests_to("GET", r"/products\.json$")) == 2  # both pages

    services.publication_publish(publication_id=publication.pk)  # published: not sent again
    assert len(printify.seen) == 5
    assert len(printify.products) == 4


def test_printify_prints_the_design_of_a_mockup_not_the_mockup(
    printify: FakePrintify, project: Project, design: str
) -> None:
    mockup = artifact_save("jobs/design-job/mockup_tshirt.png", design_png(color=(9, 9, 9)))
    publication = services.publication_record(
        destination=printify_destination(project, printify),
        artifact=mockup,
        payload={**DESIGN_PAYLOAD, "design": design},
    )
    published = services.publication_publish(publication_id=publication.pk)
    [area] = printify.products[published.external_id]["print_areas"]
    [image] = area["placeholders"][0]["images"]
    assert printify.uploads[image["id"]] == design_png()


def test_a_printify_product_whose_answer_was_lost_is_found_by_its_tag_on_the_retry(
    printify: FakePrintify, project: Project, design: str
) -> None:
    publication = design_publication(printify_destination(project, printify), design)
    printify.hang_up_after_create = 1  # Printify keeps the product; we never hear back
    error = failed_publish(publication)
    assert "broke off" in error.message
    assert printify.published == []

    published = services.publication_publish(publication_id=publication.pk)
    [product_id] = printify.products  # one product, not two
    assert published.external_id == product_id
    assert len(printify.uploads) == 1
    assert printify.published == [product_id]  # the retry published the product it found
    assert published.attempts == 2


def test_a_failed_printify_publish_call_is_retried_without_a_second_product(
    printify: FakePrintify, project: Project, design: str
) -> None:
    publication = design_publication(printify_destination(project, printify), design)
    printify.fail_publish = 1
    error = failed_publish(publication)
    assert "HTTP 500" in error.message
    printify.fail_publish = 1
    with pytest.raises(adapters.AdapterError) as raised:  # the same failure, as the stage sees it
        adapters.publish(
            publication.destination, services._item(publication), publication.idempotency_key
        )
    assert raised.value.transient is True
    assert_no_secret_shown(publication)

    published = services.publication_publish(publication_id=publication.pk)
    assert published.status == PublicationStatus.PUBLISHED
    assert list(printify.products) == [published.external_id]
    assert printify.published == [published.external_id]


def test_a_printify_destination_refuses_an_item_without_an_image(
    printify: FakePrintify, clip: Clip
) -> None:
    destination = printify_destination(clip.project, printify)
    publication = services.publication_record(destination=destination, clip=clip)
    with pytest.raises(adapters.AdapterError) as raised:
        adapters.publish(destination, services._item(publication), publication.idempotency_key)
    assert raised.value.transient is False
    assert "needs an image file" in raised.value.message
    assert "needs an image file" in failed_publish(publication).message
    assert printify.seen == []


# --- Shopify -----------------------------------------------------------------------------


def test_a_clip_and_a_design_become_shopify_products_once(
    drain: Callable[..., Any], shopify: FakeShopify, clip: Clip, design: str
) -> None:
    destination = shopify_destination(clip.project, shopify)
    job = publish_job(clip)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    published = services.publication_publish(
        publication_id=design_publication(destination, design).pk
    )

    clip_product, design_product = shopify.products
    clip_key = Publication.objects.get(clip=clip).idempotency_key
    assert clip_product["handle"] == f"omniva-{clip_key[:40]}"
    assert clip_product["title"] == "Sunset timelapse"
    assert "the sun goes down" in clip_product["body_html"]
    assert clip_product["images"] == []  # a video is no product image
    assert design_product["handle"] == f"omniva-{published.idempotency_key[:40]}"
    assert design_product["body_html"] == (
        "<p>A &lt;b&gt;retro&lt;/b&gt; sunset.<br>Printed on the front.</p>"
    )
    assert (design_product["product_type"], design_product["tags"]) == ("tshirt", "sunset, retro")
    assert design_product["variants"] == [{"price": "24.99"}]
    assert shopify.images[design_product["id"]] == design_png()
    assert published.external_id == str(design_product["id"])
    assert published.url == f"https://omniva-test.myshopify.com/products/{design_product['handle']}"
    assert all(s.headers["X-Shopify-Access-Token"] == SHOPIFY_TOKEN for s in shopify.seen)

    again = publish_job(clip)  # a re-run of the pipeline
    drain()
    again.refresh_from_db()
    assert again.status == JobStatus.COMPLETED
    assert len(shopify.products) == 2
    assert len(shopify.seen) == 4  # a lookup and a create for each, nothing more


def test_a_shopify_product_whose_answer_was_lost_is_found_by_its_handle_on_the_retry(
    drain: Callable[..., Any], due: Callable[[Job], None], shopify: FakeShopify, clip: Clip
) -> None:
    shopify_destination(clip.project, shopify)
    shopify.hang_up_after_create = 1
    job = publish_job(clip)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.RETRYING
    due(job)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    [product] = shopify.products  # not a second one with the handle `…-1`
    publication = Publication.objects.get()
    assert (publication.external_id, publication.attempts) == (str(product["id"]), 2)
    assert len(shopify.requests_to("POST", "products")) == 1


def test_a_failing_shopify_fails_the_publication_and_the_job_retries_with_backoff(
    drain: Callable[..., Any], due: Callable[[Job], None], shopify: FakeShopify, clip: Clip
) -> None:
    shopify_destination(clip.project, shopify)
    shopify.fail_next = 1
    job = publish_job(clip)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.RETRYING
    assert job.next_attempt_at is not None
    publication = Publication.objects.get()
    assert (publication.status, publication.error["code"]) == ("failed", "UPLOAD_FAILED")
    assert_no_secret_shown(publication, job)
    due(job)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    assert len(shopify.products) == 1


# --- both platforms ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["printify", "shopify"])
def test_a_wrong_token_is_a_lasting_failure_that_is_never_shown(
    kind: str,
    drain: Callable[..., Any],
    printify: FakePrintify,
    shopify: FakeShopify,
    project: Project,
    design: str,
) -> None:
    wrong = f"wrong-{kind}-token-123"
    fake: FakePlatform
    if kind == "printify":
        fake, destination = printify, printify_destination(project, printify, token=wrong)
    else:
        fake, destination = shopify, shopify_destination(project, shopify, token=wrong)
    publication = design_publication(destination, design)
    with pytest.raises(adapters.AdapterError) as raised:
        adapters.publish(destination, services._item(publication), publication.idempotency_key)
    assert raised.value.transient is False
    assert "refused the credentials" in raised.value.message
    error = failed_publish(publication)
    assert wrong not in error.message
    assert wrong not in json.dumps(publication.error)
    assert fake.products == ({} if kind == "printify" else [])


def test_a_wrong_token_fails_the_publish_job_without_retries(
    drain: Callable[..., Any], shopify: FakeShopify, clip: Clip
) -> None:
    shopify_destination(clip.project, shopify, token="wrong-token-123")
    job = publish_job(clip)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED  # no retry can make the token right
    assert (job.error["code"], job.attempts) == ("UPLOAD_FAILED", 1)
    assert Publication.objects.get().error["transient"] is False


def test_a_secret_that_shows_up_in_a_failure_is_masked(project: Project, design: str) -> None:
    secret = "hook-secret-9f8e7d"
    # A careless config: the secret is also in the URL, which the error names.
    destination = Destination.objects.create(
        project=project,
        name="hook",
        kind="webhook",
        config={"url": f"http://127.0.0.1:{free_port()}/hooks/{secret}"},
        secrets={"secret": secret},
    )
    publication = design_publication(destination, design)
    error = failed_publish(publication)
    assert secret not in error.message
    assert secret not in json.dumps(publication.error)
    assert "/hooks/[secret]" in publication.error["message"]


def test_a_shop_that_redirects_elsewhere_never_has_its_token_sent_there(
    shopify: FakeShopify, printify: FakePrintify, project: Project, design: str
) -> None:
    shopify.redirect_to = f"{printify.url}/collect"  # any other host
    publication = design_publication(shopify_destination(project, shopify), design)
    error = failed_publish(publication)
    assert "more than 0 redirects" in error.message
    assert printify.seen == []
    assert_no_secret_shown(publication)


@pytest.mark.parametrize("kind", ["s3", "printify", "shopify"])
def test_a_loopback_endpoint_is_refused_unless_private_urls_are_allowed(
    kind: str,
    settings: Any,
    s3_bucket: S3Bucket,
    printify: FakePrintify,
    shopify: FakeShopify,
    project: Project,
    design: str,
) -> None:
    settings.OMNIVA_ALLOW_PRIVATE_URLS = False
    make = {
        "s3": lambda: s3_destination(project, s3_bucket),
        "printify": lambda: printify_destination(project, printify),
        "shopify": lambda: shopify_destination(project, shopify),
    }[kind]
    publication = design_publication(make(), design)
    with pytest.raises(adapters.AdapterError) as raised:
        adapters.publish(
            publication.destination, services._item(publication), publication.idempotency_key
        )
    assert raised.value.transient is False
    assert "not allowed" in raised.value.message
    assert "not allowed" in failed_publish(publication).message
    assert (s3_bucket.keys(), printify.seen, shopify.seen) == ([], [], [])
