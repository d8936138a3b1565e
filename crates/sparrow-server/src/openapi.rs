//! `GET /openapi.json`: the OpenAPI 3.1 description of the routes, generated from the
//! request types the handlers parse (`utoipa`), so it cannot drift from them.

use crate::{anthropic, openai, operations};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sparrow",
        description = "The OpenAI and Anthropic APIs over Sparrow's engine (sparrow serve)"
    ),
    paths(
        openai::chat_completions,
        openai::completions,
        openai::model,
        operations::models,
        anthropic::messages,
        anthropic::count_tokens,
        operations::health,
        operations::metrics,
    )
)]
pub struct ApiDoc;

/// The document as JSON.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
