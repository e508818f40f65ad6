//! The catalog's contracts, shared with its clients (the gateway): the gRPC service and the JSON
//! form of a product that the REST API answers with.

use serde::Serialize;

pub mod proto {
    tonic::include_proto!("switchyard.catalog.v1");
}

/// A product as the REST API shows it (the gateway answers the same shape when it translates a
/// REST route to the gRPC API).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductJson {
    pub id: String,
    pub name: String,
    pub description: String,
    pub category: String,
    pub price: PriceJson,
    pub rating: f64,
    pub image_url: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PriceJson {
    pub amount_cents: i64,
    pub currency: String,
}

impl From<proto::Product> for ProductJson {
    fn from(p: proto::Product) -> Self {
        Self {
            id: p.id,
            name: p.name,
            description: p.description,
            category: p.category,
            price: PriceJson { amount_cents: p.price_cents, currency: p.currency },
            rating: p.rating,
            image_url: p.image_url,
        }
    }
}
