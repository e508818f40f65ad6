//! `catalog`: products in the service's own database, listed with paging and text search and
//! fetched by id, over REST (`/products`, `/products/{id}`, `/categories`) and over gRPC
//! (`switchyard.catalog.v1.Catalog`) on the same port.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use catalog::ProductJson;
use catalog::proto::catalog_server::{Catalog, CatalogServer};
use catalog::proto::{GetProductRequest, ListProductsRequest, ListProductsResponse, Product};
use clap::Parser;
use common::ApiError;
use common::args::ServiceArgs;
use common::http::db_call;
use common::service::Service;
use serde::Serialize;
use sqlx::{Row, SqlitePool};

#[derive(Debug, Parser)]
#[command(name = "catalog", about = "Switchyard's catalog service", version)]
struct Config {
    #[command(flatten)]
    service: ServiceArgs,
}

const DB: &str = "catalog";
const MAX_PAGE_SIZE: u32 = 100;

#[derive(Clone)]
struct Products {
    db: SqlitePool,
}

/// The WHERE clause of a list: ?1 a LIKE pattern or NULL, ?2 a category or NULL.
macro_rules! filter {
    () => {
        "(?1 IS NULL OR name LIKE ?1 ESCAPE '\\' OR description LIKE ?1 ESCAPE '\\') AND (?2 IS NULL OR category = ?2 COLLATE NOCASE)"
    };
}

/// What a list asks for, validated.
struct ListQuery {
    text: Option<String>,
    category: Option<String>,
    page: u32,
    page_size: u32,
}

impl Products {
    async fn list(&self, q: &ListQuery) -> Result<(Vec<Product>, u64), ApiError> {
        let pattern = q.text.as_ref().map(|t| format!("%{}%", t.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
        let count =
            sqlx::query_scalar::<_, i64>(concat!("SELECT COUNT(*) FROM products WHERE ", filter!())).bind(&pattern).bind(&q.category).fetch_one(&self.db);
        let total = db_call("SELECT", "products", DB, count).await.map_err(ApiError::internal)?;
        let offset = i64::from(q.page - 1) * i64::from(q.page_size);
        let rows = sqlx::query(concat!(
            "SELECT id, name, description, category, price_cents, currency, rating, image_url FROM products WHERE ",
            filter!(),
            " ORDER BY category, name LIMIT ?3 OFFSET ?4"
        ))
        .bind(&pattern)
        .bind(&q.category)
        .bind(i64::from(q.page_size))
        .bind(offset)
        .fetch_all(&self.db);
        let rows = db_call("SELECT", "products", DB, rows).await.map_err(ApiError::internal)?;
        let products = rows.iter().map(product).collect::<Result<_, _>>().map_err(ApiError::internal)?;
        Ok((products, total as u64))
    }

    async fn get(&self, id: &str) -> Result<Product, ApiError> {
        let row = sqlx::query("SELECT id, name, description, category, price_cents, currency, rating, image_url FROM products WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.db);
        let row = db_call("SELECT", "products", DB, row).await.map_err(ApiError::internal)?;
        let row = row.ok_or_else(|| ApiError::NotFound(format!("no product with id {id:?}")))?;
        product(&row).map_err(ApiError::internal)
    }
}

fn product(r: &sqlx::sqlite::SqliteRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        category: r.try_get("category")?,
        price_cents: r.try_get("price_cents")?,
        currency: r.try_get("currency")?,
        rating: r.try_get("rating")?,
        image_url: r.try_get("image_url")?,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let svc = Service::start("catalog", cfg.service.clone()).await?;
    let db = common::db::open(&cfg.service.db_path("catalog"), 4).await?;
    common::db::migrate(&db, &sqlx::migrate!()).await?;
    let products = Products { db };
    let grpc = common::http::grpc_routes(CatalogServer::new(products.clone()));
    let rest = Router::new()
        .route("/products", get(list_products))
        .route("/products/{id}", get(get_product))
        .route("/categories", get(categories))
        .with_state(Arc::new(products));
    let metadata = [("api".to_owned(), "rest,grpc".to_owned()), ("grpc.service".to_owned(), "switchyard.catalog.v1.Catalog".to_owned())];
    svc.serve(rest.merge(grpc), metadata.into()).await
}

// ---- REST ----

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PageJson {
    items: Vec<ProductJson>,
    page: u32,
    page_size: u32,
    total: u64,
    total_pages: u64,
}

fn number(q: &HashMap<String, String>, name: &str, default: u32, max: u32) -> Result<u32, ApiError> {
    match q.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::bad_field(name, format!("{name} must be an integer from 1 to {max}, got {v:?}"))),
    }
}

fn non_empty(q: &HashMap<String, String>, name: &str) -> Option<String> {
    q.get(name).map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

async fn list_products(State(p): State<Arc<Products>>, Query(q): Query<HashMap<String, String>>) -> Result<Json<PageJson>, ApiError> {
    let query = ListQuery {
        text: non_empty(&q, "q"),
        category: non_empty(&q, "category"),
        page: number(&q, "page", 1, 1_000_000)?,
        page_size: number(&q, "pageSize", 20, MAX_PAGE_SIZE)?,
    };
    let (items, total) = p.list(&query).await?;
    Ok(Json(PageJson {
        items: items.into_iter().map(ProductJson::from).collect(),
        page: query.page,
        page_size: query.page_size,
        total,
        total_pages: total.div_ceil(u64::from(query.page_size)),
    }))
}

async fn get_product(State(p): State<Arc<Products>>, Path(id): Path<String>) -> Result<Json<ProductJson>, ApiError> {
    Ok(Json(p.get(&id).await?.into()))
}

#[derive(Serialize)]
struct CategoryJson {
    name: String,
    products: i64,
}

async fn categories(State(p): State<Arc<Products>>) -> Result<Json<Vec<CategoryJson>>, ApiError> {
    let rows = sqlx::query("SELECT category, COUNT(*) AS n FROM products GROUP BY category ORDER BY category").fetch_all(&p.db);
    let rows = db_call("SELECT", "products", DB, rows).await.map_err(ApiError::internal)?;
    rows.iter()
        .map(|r| Ok(CategoryJson { name: r.try_get("category")?, products: r.try_get("n")? }))
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map(Json)
        .map_err(ApiError::internal)
}

// ---- gRPC ----

#[tonic::async_trait]
impl Catalog for Products {
    async fn list_products(&self, req: tonic::Request<ListProductsRequest>) -> Result<tonic::Response<ListProductsResponse>, tonic::Status> {
        let r = req.into_inner();
        if r.page_size > MAX_PAGE_SIZE {
            return Err(ApiError::bad_field("page_size", format!("page_size must be at most {MAX_PAGE_SIZE}, got {}", r.page_size)).into());
        }
        let query = ListQuery {
            text: Some(r.query.trim().to_owned()).filter(|s| !s.is_empty()),
            category: Some(r.category.trim().to_owned()).filter(|s| !s.is_empty()),
            page: r.page.max(1),
            page_size: if r.page_size == 0 { 20 } else { r.page_size },
        };
        let (products, total) = self.list(&query).await?;
        Ok(tonic::Response::new(ListProductsResponse { products, page: query.page, page_size: query.page_size, total }))
    }

    async fn get_product(&self, req: tonic::Request<GetProductRequest>) -> Result<tonic::Response<Product>, tonic::Status> {
        Ok(tonic::Response::new(self.get(&req.into_inner().id).await?))
    }
}
